"""valuemix.ui: the Gradio slider app (needs the `ui` extra: pip install 'valuemix[ui]')."""
