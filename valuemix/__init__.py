"""valuemix: steer a frozen language model at decode time by mixing learned value heads."""

__version__ = "0.1.0"
