"""The slider app: `build_app(world) -> gr.Blocks`. The logic lives in `ui/logic.py`; launch from the CLI.

    from valuemix.ui.app import build_app
    app = build_app(load_demo())          # or build_app(AppParts(base, tokenizer, bank, rewards))
    app.launch(server_name="127.0.0.1")

The page: a prompt (with example prompts), one slider per head (its head_config beta_range),
presets (saved per session, shared as a URL query string `?helpful=1.5&concise=-0.5`), the base
reply (all β = 0) beside the mixed reply for the same seed, streamed token by token, every reward
and the KL from the base, a trade-off plot of the mixes tried so far, and "why this token".
Releasing a slider regenerates (`.release`, trigger_mode="always_last").

HTTP API (gradio_client): `/generate(prompt, weights, max_new_tokens, seed) -> (text, result)`,
weights a JSON object string or a dict head -> coefficient; result holds rewards, KL and the base.
"""

from __future__ import annotations

import logging
import math
import time

import gradio as gr
import pandas as pd

from valuemix.compose.mixer import DEFAULT_TOP_P
from valuemix.ui.logic import (
    MAX_NEW_TOKENS,
    AppParts,
    RequestError,
    as_parts,
    axis_choices,
    beta_range,
    default_axes,
    default_weights,
    explain_step,
    first_divergence,
    load_preset,
    mix_from_query,
    mix_label,
    mix_to_query,
    record,
    run_mix,
    run_mix_once,
    save_preset,
    step_choices,
    trade_off_rows,
    validate_request,
)

logger = logging.getLogger(__name__)
POINT_COLOURS = {"base": "#111827", "tried": "#9ca3af", "current": "#ef4444"}
INTRO = """# valuemix: mix value heads with sliders
Each slider is a value head's coefficient β (negative pushes away from its reward). The left reply is the
base model (every β = 0, the same seed), the right one is your mix. Release a slider to regenerate."""


def scores_frame(parts: AppParts, outcome=None) -> pd.DataFrame:
    """Rows: every reward, then the KL from the base; columns: base, mixed, Δ."""
    rows = []
    for name in parts.rewards:
        b, m = (outcome.base.rewards[name], outcome.mixed.rewards[name]) if outcome else (None, None)
        rows.append([f"reward: {name}", b, m, None if outcome is None else m - b])
    kl = (outcome.base.kl, outcome.mixed.kl) if outcome else (None, None)
    rows.append(["KL from base (nats)", *kl, None if outcome is None else kl[1] - kl[0]])
    frame = pd.DataFrame(rows, columns=["", "base", "mixed", "Δ"])
    return frame.round(3)


def why_frame(parts: AppParts, rows: list[dict]) -> pd.DataFrame:
    """The "why this token" table: one row per top-k candidate, best final logit first."""
    heads = parts.heads
    columns = ["", "token", "base logit", *heads, "final logit", "p base", "p mix"]  # a head's column: β·(V − V̄)
    data = [["→" if r["chosen"] else "", r["token"], r["base_logit"], *[r["contributions"][h] for h in heads],
             r["final_logit"], r["p_base"], r["p_mixed"]] for r in rows]
    return pd.DataFrame(data, columns=columns).round(3)


def padded_limits(values) -> list[float] | None:
    """Axis limits with a margin, so that points on the edge of the data stay visible."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return None
    low, high = min(values), max(values)
    margin = 0.1 * (high - low) if high > low else max(0.5, 0.1 * abs(low))
    return [low - margin, high + margin]


def plot_update(history: list[dict], x: str, y: str) -> gr.ScatterPlot:
    """The trade-off plot: every point tried, the base points and the current mix in its own colour."""
    rows = trade_off_rows(history, x, y)
    frame = pd.DataFrame(rows, columns=["x", "y", "mix", "point"])
    return gr.ScatterPlot(value=frame, x="x", y="y", color="point", x_title=x, y_title=y,
                          x_lim=padded_limits([r["x"] for r in rows]), y_lim=padded_limits([r["y"] for r in rows]),
                          color_map=POINT_COLOURS, tooltip=["mix", "x", "y"])


def status_line(history: list[dict], outcome, seconds: float) -> str:
    tried = sum(p["kind"] == "mix" for p in history)
    return (f"**Mix:** {mix_label(outcome.request.weights)} · {len(outcome.mixed.token_ids)} tokens · "
            f"KL {outcome.mixed.kl:.3f} nats · {seconds:.1f} s · {tried} mixes tried")


def slider_step(low: float, high: float) -> float:
    return 0.1 if high - low >= 2 else 0.01


class Handlers:
    """The page's event handlers for one `AppParts` (methods, so that gradio reads their type hints)."""

    def __init__(self, parts: AppParts):
        self.parts = parts
        self.heads = parts.heads

    def show_mix(self, text, n_tokens, seed_value, points, x, y, *betas):
        """Base and mixed replies, streamed; then scores, plot, history, status and "why this token".

        Yields values for [base, mixed, scores, plot, history, last, status, step, why]; the streamed
        ones leave all but the two replies unchanged.
        """
        yield from self._generate(False, text, n_tokens, seed_value, points, x, y, betas)

    def show_mix_live(self, text, n_tokens, seed_value, points, x, y, *betas):
        """`show_mix` after a slider moved: without a prompt yet, a hint instead of a warning."""
        yield from self._generate(True, text, n_tokens, seed_value, points, x, y, betas)

    def _generate(self, live, text, n_tokens, seed_value, points, x, y, betas):
        parts = self.parts
        if live and not (text or "").strip():
            gr.Info("Type a prompt (or pick an example) to see this mix.")
            return
        try:
            request = validate_request(parts, text, dict(zip(self.heads, betas)), n_tokens, seed_value)
        except RequestError as err:
            gr.Warning(str(err))
            return
        start = time.perf_counter()
        try:
            for partial in run_mix(parts, request):
                if partial.outcome is None:
                    yield partial.base_text, partial.mixed_text, *[gr.skip()] * 7
            outcome = partial.outcome
            points = record(points, outcome)
            first = first_divergence(outcome.base.token_ids, outcome.mixed.token_ids)
            explained = why_frame(parts, explain_step(parts, outcome, first))
        except Exception as err:  # the page says what failed; the app stays up
            logger.exception("generation failed")
            raise gr.Error(f"Generation failed: {err}", print_exception=False) from err
        yield (outcome.base.text, outcome.mixed.text, scores_frame(parts, outcome), plot_update(points, x, y), points,
               outcome, status_line(points, outcome, time.perf_counter() - start),
               gr.Dropdown(choices=step_choices(parts.tokenizer, outcome.mixed.token_ids), value=first), explained)

    def share_link(self, url, *betas) -> str:
        """The page URL with this mix as its query string."""
        return (url or "") + mix_to_query(dict(zip(self.heads, betas)))

    def reset(self) -> list[float]:
        return list(default_weights(self.parts.bank).values())

    def save_preset(self, name, saved, *betas):
        try:
            saved = save_preset(saved, name, dict(zip(self.heads, betas)))
        except RequestError as err:
            gr.Warning(str(err))
            return gr.skip(), gr.skip()
        gr.Info(f"Saved preset {name.strip()!r}: {mix_label(saved[name.strip()])}")
        return saved, gr.Dropdown(choices=list(saved), value=name.strip())

    def load_preset(self, name, saved):
        try:
            weights = load_preset(saved, name)
        except RequestError as err:
            gr.Warning(str(err))
            return [gr.skip()] * len(self.heads)
        return [weights.get(h, 0.0) for h in self.heads]

    def page_load(self, request: gr.Request):
        """Sliders from the page's query string (`?helpful=1.5&concise=-0.5`), and the page URL for sharing."""
        url = (request.headers.get("referer") or "").split("?")[0] if request else ""
        weights = default_weights(self.parts.bank)
        try:
            weights = mix_from_query(self.parts.bank, dict(request.query_params), strict=False) if request else weights
        except RequestError as err:
            gr.Warning(f"Ignored the mix in the link: {err}")
        return [*weights.values(), url, url + mix_to_query(weights)]

    def explain(self, outcome, chosen):
        """The "why this token" table at the chosen step."""
        if outcome is None or chosen is None:
            return gr.skip()
        try:
            return why_frame(self.parts, explain_step(self.parts, outcome, int(chosen)))
        except RequestError as err:
            gr.Warning(str(err))
            return gr.skip()
        except Exception as err:
            logger.exception("explaining a step failed")
            raise gr.Error(f"Could not explain step {chosen}: {err}", print_exception=False) from err

    def api_generate(self, prompt: str, weights: str | dict = "{}", max_new_tokens: int = 64,
                     seed: int = 0) -> tuple[str, dict]:
        """Generate with a mix: (mixed text, {"rewards", "kl", "weights", "seed", "base": {...}}).

        weights: a JSON object string or a dict head -> coefficient (heads left out are 0).
        """
        try:
            request = validate_request(self.parts, prompt, weights, max_new_tokens, seed)
        except RequestError as err:
            raise gr.Error(str(err), print_exception=False) from err
        try:
            outcome = run_mix_once(self.parts, request)
        except Exception as err:  # the caller gets the message; the app stays up
            logger.exception("generation failed")
            raise gr.Error(f"Generation failed: {err}", print_exception=False) from err
        return outcome.mixed.text, outcome.summary()


def build_app(world, *, concurrency_limit: int = 2, max_new_tokens: int = 64, top_k: int = 20,
              top_p: float = DEFAULT_TOP_P, title: str = "valuemix") -> gr.Blocks:
    """The slider app for `world`: an `AppParts` or anything like `DemoWorld` (base, tokenizer, bank, ...).

    Args:
        world: what to steer (see `valuemix.ui.logic.AppParts`; a `DemoWorld` is converted).
        concurrency_limit: generations run at once (the queue's default concurrency).
        max_new_tokens: the length slider's starting value (at most `MAX_NEW_TOKENS`).
        top_k, top_p: the mixer's candidate sets (see `Mixer`), when `world` is not already an `AppParts`.
        title: the browser tab's title.
    """
    parts = as_parts(world, top_k=top_k, top_p=top_p)
    heads = parts.heads
    if not heads:
        raise ValueError("The bank has no heads: load at least one head to build the slider app.")
    x0, y0 = default_axes(parts)
    with gr.Blocks(title=title, analytics_enabled=False) as app:  # no usage reports
        history = gr.State([])
        presets = gr.State({})
        last = gr.State(None)
        page_url = gr.State("")
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Type a request, or pick an example below",
                                    elem_id="prompt")
                if parts.examples:
                    gr.Examples([[e] for e in parts.examples], inputs=[prompt], label="Example prompts (held out)",
                                examples_per_page=6)
                with gr.Row():
                    tokens = gr.Slider(1, MAX_NEW_TOKENS, value=min(max_new_tokens, MAX_NEW_TOKENS), step=1,
                                       label="max new tokens", elem_id="max-new-tokens")
                    seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="seed")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("Presets and sharing", open=True):
                    with gr.Row():
                        preset_name = gr.Textbox(label="preset name", scale=2, elem_id="preset-name")
                        save = gr.Button("Save", scale=1, elem_id="save-preset")
                    with gr.Row():
                        preset_pick = gr.Dropdown([], label="saved presets", scale=2, elem_id="preset-pick")
                        load = gr.Button("Load", scale=1, elem_id="load-preset")
                    share = gr.Textbox(label="share this mix (URL query string)", elem_id="share",
                                       buttons=["copy"], interactive=False)
            with gr.Column(scale=2):
                sliders = []
                for head in heads:
                    low, high = beta_range(parts.bank, head)
                    sliders.append(gr.Slider(low, high, value=default_weights(parts.bank)[head],
                                             step=slider_step(low, high), label=f"β {head}",
                                             info=parts.bank.configs[head].reward or None, elem_id=f"beta-{head}"))
                reset = gr.Button("Reset (all β = 0)", elem_id="reset")
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            base_box = gr.Textbox(label="Base (all β = 0, same seed)", lines=7, interactive=False,
                                  elem_id="base-output")
            mixed_box = gr.Textbox(label="Mixed", lines=7, interactive=False, elem_id="mixed-output")
        with gr.Row():
            with gr.Column(scale=2):
                scores = gr.Dataframe(scores_frame(parts), label="Rewards and KL", interactive=False,
                                      elem_id="scores")
            with gr.Column(scale=3):
                plot = gr.ScatterPlot(pd.DataFrame(columns=["x", "y", "mix", "point"]), x="x", y="y", color="point",
                                      x_title=x0, y_title=y0, color_map=POINT_COLOURS, label="Trade-offs: mixes tried",
                                      elem_id="trade-off")
                with gr.Row():
                    x_axis = gr.Dropdown(axis_choices(parts), value=x0, label="x axis", elem_id="x-axis")
                    y_axis = gr.Dropdown(axis_choices(parts), value=y0, label="y axis", elem_id="y-axis")
        with gr.Accordion("Why this token?", open=True):
            step = gr.Dropdown([], label="step of the mixed reply (starts where it leaves the base)",
                               elem_id="step")
            why = gr.Dataframe(label="top-k candidates: base logit + each head's column β·(V − mean V) = final logit",
                               interactive=False, elem_id="why")

        # ------------------------------------------------------------------------------- events
        on = Handlers(parts)
        inputs = [prompt, tokens, seed, history, x_axis, y_axis, *sliders]
        outputs = [base_box, mixed_box, scores, plot, history, last, status, step, why]  # as Handlers.show_mix yields
        private = {"api_visibility": "private"}
        decoding = {"trigger_mode": "always_last", "concurrency_id": "decoding", **private}  # one pool of N workers
        gr.on([run.click, prompt.submit], on.show_mix, inputs, outputs, **decoding)
        gr.on([s.release for s in sliders], on.show_mix_live, inputs, outputs, **decoding)
        gr.on([s.change for s in sliders], on.share_link, [page_url, *sliders], share, trigger_mode="always_last",
              queue=False, show_progress="hidden", **private)
        reset.click(on.reset, None, sliders, **private).then(on.show_mix_live, inputs, outputs, **decoding)
        save.click(on.save_preset, [preset_name, presets, *sliders], [presets, preset_pick], **private)
        load.click(on.load_preset, [preset_pick, presets], sliders, **private).then(
            on.show_mix_live, inputs, outputs, **decoding)
        app.load(on.page_load, None, [*sliders, page_url, share], **private)
        gr.on([x_axis.change, y_axis.change], plot_update, [history, x_axis, y_axis], plot, queue=False, **private)
        step.input(on.explain, [last, step], why, **decoding)
        gr.api(on.api_generate, api_name="generate", concurrency_id="decoding")
    app.queue(default_concurrency_limit=concurrency_limit)
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
    """Serve the app (blocks until stopped); bound to localhost unless `host` says otherwise."""
    return app.launch(server_name=host, server_port=port, share=share, **kwargs)
