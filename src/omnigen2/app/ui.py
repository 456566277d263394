"""The page of ``omnigen2 app``: a Create view and a Chat view over one :class:`~omnigen2.app.session.Session`.

Only widgets and their wiring live here; each handler reads the widgets into the session's settings, calls the
session (which calls the library's pipelines) and shows what came back. A ``ValueError`` from the session (a bad
upload, too many images, a setting out of range) becomes a ``gr.Error``: the page shows it, keeps every input, and
the app goes on. Two named endpoints, ``generate`` and ``chat``, serve ``gradio_client`` scripts (docs/APP.md).
"""

from __future__ import annotations

import gradio as gr

from .session import (
    MAX_IMAGES_PER_PROMPT,
    MAX_INPUT_IMAGES,
    MAX_REFLECT,
    MAX_SEED,
    MAX_STEPS,
    SCHEDULERS,
    SIZE_RANGE,
    STEP_CACHES,
    Cancelled,
    ChatReply,
    ChatSettings,
    CreateSettings,
    Session,
    examples_for,
)

INTRO = (
    "## OmniGen2\n"
    "**Create**: text-to-image without input images, editing with one, in-context generation with several. "
    "**Chat**: the model answers in words or decides to draw, and can judge and repair its drawing (reflection)."
)


def offline_theme() -> gr.themes.Base:
    """Gradio's default look with the system's fonts: the default theme fetches its fonts from a CDN, and the
    page must work on a machine without internet access."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
    )


def build_demo(session: Session) -> gr.Blocks:
    d = session.defaults()
    examples = examples_for(session)
    with gr.Blocks(title="OmniGen2") as demo:
        gr.Markdown(INTRO + f"\n\nModel: `{session.model_name}`")
        with gr.Tabs():
            with gr.Tab("Create", id="create"):
                _create_view(session, d, examples.create)
            with gr.Tab("Chat", id="chat"):
                _chat_view(session, d, examples.chat)
    return demo


def _size_sliders(d: dict, view: str) -> tuple[gr.Slider, gr.Slider]:
    with gr.Row():
        width = gr.Slider(*SIZE_RANGE, value=d["width"], step=16, label="Width", elem_id=f"{view}-width")
        height = gr.Slider(*SIZE_RANGE, value=d["height"], step=16, label="Height", elem_id=f"{view}-height")
    return width, height


def _seed_row() -> tuple[gr.Number, gr.Checkbox]:
    with gr.Row():
        seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
        randomize = gr.Checkbox(value=False, label="Randomize seed")
    return seed, randomize


def _paths(gallery) -> list[str]:
    """A gallery's value ((path, caption) pairs) -> the paths."""
    return [item[0] if isinstance(item, list | tuple) else item for item in gallery or []]


def _stepper(progress: gr.Progress, total: int, what: str):
    progress((0, total), desc=what)
    return lambda step: progress((min(step, total), total), desc=what)


def _run(fn, *args, **kwargs):
    """Call the session; its refusals and a cancel become messages in the page."""
    try:
        return fn(*args, **kwargs)
    except Cancelled:
        raise gr.Error("Cancelled.", title="Cancelled") from None
    except ValueError as e:
        raise gr.Error(str(e), title="Cannot run this") from None


# -- Create ---------------------------------------------------------------------------------------------------


def _create_view(session: Session, d: dict, examples: list) -> None:
    with gr.Row():
        with gr.Column(scale=5):
            prompt = gr.Textbox(
                label="Prompt", lines=3, placeholder="What to draw, or how to change the input images", elem_id="prompt"
            )
            inputs = gr.Gallery(
                label=f"Input images (up to {MAX_INPUT_IMAGES}; none: text-to-image, one: editing, several: "
                "in-context generation)",
                type="filepath",
                interactive=True,
                columns=5,
                height=170,
                object_fit="contain",
                file_types=["image"],
                elem_id="input-images",
            )
            negative = gr.Textbox(
                value="", label="Negative prompt", lines=1, placeholder="(empty: the model's default)"
            )
            width, height = _size_sliders(d, "create")
            with gr.Accordion("Sampling", open=True):
                with gr.Row():
                    text_guidance = gr.Slider(0, 20, value=d["text_guidance"], step=0.1, label="Text guidance")
                    image_guidance = gr.Slider(0, 20, value=d["image_guidance"], step=0.1, label="Image guidance")
                with gr.Row():
                    cfg_start = gr.Slider(0, 1, value=0, step=0.05, label="CFG range start")
                    cfg_end = gr.Slider(0, 1, value=1, step=0.05, label="CFG range end")
                with gr.Row():
                    scheduler = gr.Dropdown(list(SCHEDULERS), value=d["scheduler"], label="Scheduler")
                    steps = gr.Slider(1, MAX_STEPS, value=d["steps"], step=1, label="Steps")
                    num_images = gr.Slider(
                        1,
                        MAX_IMAGES_PER_PROMPT,
                        value=1,
                        step=1,
                        label="Images per prompt",
                        elem_id="create-num-images",
                    )
                seed, randomize = _seed_row()
            with gr.Accordion("Input-size limits and step cache", open=False):
                with gr.Row():
                    max_pixels = gr.Number(value=1024 * 1024, precision=0, label="Max pixels of an input image")
                    max_side = gr.Number(value=1024, precision=0, label="Max side of an input image")
                keep_size = gr.Checkbox(value=True, label="Editing one image: keep its size (else width x height)")
                with gr.Row():
                    cache = gr.Radio(list(STEP_CACHES), value="none", label="Step cache (faster, approximate)")
                    threshold = gr.Slider(0.01, 0.5, value=0.05, step=0.01, label="TeaCache threshold")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                cancel = gr.Button("Cancel", variant="stop")
        with gr.Column(scale=4):
            gallery = gr.Gallery(
                label="Results (download: PNG with the settings in its text chunks)",
                type="filepath",
                format="png",
                columns=2,
                height=360,
                object_fit="contain",
                preview=False,
                interactive=False,
                buttons=["download", "fullscreen"],
                elem_id="results",
            )
            selected = gr.State(0)
            use = gr.Button("Use as input", elem_id="use-as-input")
            status = gr.Markdown(label="Status", elem_id="create-status")
    if examples:
        gr.Examples([[p, imgs or None] for p, imgs in examples], inputs=[prompt, inputs], label="Examples")

    def generate(
        prompt,
        input_images,
        negative_prompt,
        width,
        height,
        text_guidance,
        image_guidance,
        cfg_start,
        cfg_end,
        scheduler,
        steps,
        num_images,
        seed,
        randomize_seed,
        max_pixels,
        max_input_side,
        step_cache,
        teacache_threshold,
        keep_input_size,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008 - gradio's way of asking for a progress bar
    ):
        """Text-to-image (no input images), editing (one) or in-context generation (several).

        Args:
            prompt: the instruction.
            input_images: up to 5 images (a list of files), or None.
            negative_prompt: the text guidance's negative prompt ("" for the model's default).
            width: output width, a multiple of 16.
            height: output height, a multiple of 16.
            text_guidance: text guidance scale.
            image_guidance: image guidance scale (with input images).
            cfg_start: guidance applies to steps whose fraction i/N is at least this.
            cfg_end: ... and at most this.
            scheduler: "euler" or "dpmsolver++".
            steps: denoising steps.
            num_images: images per prompt.
            seed: random seed (ignored when randomize_seed is true).
            randomize_seed: draw a new seed.
            max_pixels: pixel budget of an input image (larger ones are downscaled).
            max_input_side: longest side of an input image.
            step_cache: "none", "teacache" or "taylorseer".
            teacache_threshold: TeaCache's threshold (with step_cache "teacache").
            keep_input_size: with one input image, draw at its size (else at width x height).
        Returns:
            The images (PNG files with the settings in their "parameters" text chunk), the seed used and a status.
        """
        used_seed = session.pick_seed(seed or 0, randomize_seed)
        settings = CreateSettings(
            prompt,
            negative_prompt or "",
            width,
            height,
            text_guidance,
            image_guidance,
            cfg_start,
            cfg_end,
            scheduler,
            steps,
            num_images,
            used_seed,
            max_pixels,
            max_input_side,
            step_cache,
            teacache_threshold,
            keep_input_size,
        )
        on_step = _stepper(progress, int(steps or 1), "denoising")
        key = request.session_hash if request is not None else ""
        paths = _run(session.generate, settings, _paths(input_images), key, on_step)
        shown = [(str(p), f"seed {used_seed}" + (f" #{k}" if len(paths) > 1 else "")) for k, p in enumerate(paths)]
        return shown, used_seed, f"Seed {used_seed}: {len(paths)} image(s) of {int(width)}x{int(height)}."

    event = run.click(
        generate,
        [
            prompt,
            inputs,
            negative,
            width,
            height,
            text_guidance,
            image_guidance,
            cfg_start,
            cfg_end,
            scheduler,
            steps,
            num_images,
            seed,
            randomize,
            max_pixels,
            max_side,
            cache,
            threshold,
            keep_size,
        ],
        [gallery, seed, status],
        api_name="generate",
    )

    def cancel_run(request: gr.Request):
        session.cancel(request.session_hash if request is not None else "")

    # The flag stops the pipeline at its next step; `cancels` frees the page at once.
    cancel.click(cancel_run, None, None, api_name=False, concurrency_limit=None, cancels=[event])

    def on_select(evt: gr.SelectData):
        return evt.index

    gallery.select(on_select, None, selected, api_name=False, concurrency_limit=None)

    def use_as_input(results, index, current):
        paths = _paths(results)
        if not paths:
            raise gr.Error("Generate an image first, then pick it in the results.")
        current = _paths(current)
        if len(current) >= MAX_INPUT_IMAGES:
            raise gr.Error(f"There are already {MAX_INPUT_IMAGES} input images; remove one first.")
        return [*current, paths[min(int(index or 0), len(paths) - 1)]]

    use.click(use_as_input, [gallery, selected, inputs], inputs, api_name=False, concurrency_limit=None)


# -- Chat -----------------------------------------------------------------------------------------------------


def _chat_view(session: Session, d: dict, examples: list) -> None:
    history = gr.State([])  # the library's Turns, with their images
    shown = gr.State([])  # the messages on screen: kept here, so an API client sends only the new message
    chatbot = gr.Chatbot(label="Conversation", height=560, elem_id="chatbot")
    message = gr.MultimodalTextbox(
        placeholder="Ask about images, or ask for a drawing (attach up to 5 images)",
        file_types=["image"],
        file_count="multiple",
        label="Message",
        show_label=False,
        elem_id="chat-input",
    )
    with gr.Row():
        reflect = gr.Slider(
            0,
            MAX_REFLECT,
            value=0,
            step=1,
            label="Reflection rounds (judge and repair a drawing)",
            elem_id="chat-reflect",
        )
        clear = gr.Button("Clear conversation", elem_id="chat-clear")
    with gr.Accordion("Drawing settings", open=False):
        width, height = _size_sliders(d, "chat")
        with gr.Row():
            steps = gr.Slider(1, MAX_STEPS, value=d["steps"], step=1, label="Steps")
            text_guidance = gr.Slider(0, 20, value=d["text_guidance"], step=0.1, label="Text guidance")
            image_guidance = gr.Slider(0, 20, value=d["image_guidance"], step=0.1, label="Image guidance")
        seed, randomize = _seed_row()
        with gr.Row():
            max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="Longest answer (tokens)")
            force_image = gr.Checkbox(value=False, label="Always draw (start the answer with <|img|>)")
    if examples:
        gr.Examples([[{"text": t, "files": imgs}] for t, imgs in examples], inputs=[message], label="Examples")

    def chat(
        message,
        transcript,
        turns,
        reflect,
        width,
        height,
        steps,
        text_guidance,
        image_guidance,
        seed,
        randomize_seed,
        max_new_tokens,
        force_image,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008 - gradio's way of asking for a progress bar
    ):
        """One chat turn: a text answer, or a drawing (then `reflect` rounds of judging and repairing it).

        Args:
            message: {"text": the message, "files": up to 5 images}.
            reflect: reflection rounds after a drawing.
            width: drawing width, a multiple of 16.
            height: drawing height, a multiple of 16.
            steps: denoising steps of a drawing.
            text_guidance: text guidance scale.
            image_guidance: image guidance scale.
            seed: random seed (ignored when randomize_seed is true).
            randomize_seed: draw a new seed.
            max_new_tokens: longest answer in tokens.
            force_image: always draw.
        Returns:
            The conversation with this turn's messages (text, drawings, each reflection round), the emptied
            message box and the seed used. The conversation stays with the session (a gradio_client Client is one)
            for the next call; the "chat_clear" endpoint starts a new one.
        """
        message = message or {}
        text, files = message.get("text") or "", list(message.get("files") or [])
        used_seed = session.pick_seed(seed or 0, randomize_seed)
        settings = ChatSettings(
            reflect, used_seed, width, height, steps, text_guidance, image_guidance, max_new_tokens, force_image
        )
        on_step = _stepper(progress, int(steps or 1), "thinking, then drawing")
        key = request.session_hash if request is not None else ""
        reply = _run(session.chat_turn, list(turns or []), text, [_file_path(f) for f in files], settings, key, on_step)
        user = [{"role": "user", "content": {"path": _file_path(f)}} for f in files]
        user.append({"role": "user", "content": text})
        messages = [*(transcript or []), *user, *_reply_messages(reply)]
        return messages, messages, reply.history, None, used_seed

    chat_inputs = [
        message,
        shown,
        history,
        reflect,
        width,
        height,
        steps,
        text_guidance,
        image_guidance,
        seed,
        randomize,
        max_new_tokens,
        force_image,
    ]
    message.submit(chat, chat_inputs, [chatbot, shown, history, message, seed], api_name="chat")
    clear.click(lambda: ([], [], [], None), None, [chatbot, shown, history, message], api_name="chat_clear")


def _file_path(f) -> str:
    return f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", str(f)))


def _reply_messages(reply: ChatReply) -> list[dict]:
    """The assistant's part of a turn: its words, its drawing, and per reflection round the verdict, the fix and
    the repaired image."""
    out = []
    if reply.text:
        out.append({"role": "assistant", "content": reply.text})
    if reply.drawing is not None:
        out.append({"role": "assistant", "content": {"path": str(reply.drawing), "alt_text": "the drawing"}})
    for k, r in enumerate(reply.rounds, 1):
        note = f"The model said: “{r.answer}”"
        if r.fix and r.image is not None:
            note += f"\n\nRepaired with: *{r.fix}* (below)"
        elif r.fix:
            note += f"\n\nSuggested fix: *{r.fix}* (not drawn: no rounds left)"
        out.append({"role": "assistant", "content": note, "metadata": {"title": f"Reflection {k}: {r.verdict}"}})
        if r.image is not None:
            out.append({"role": "assistant", "content": {"path": str(r.image), "alt_text": f"repair {k}"}})
    if any(r.image is not None for r in reply.rounds):
        kept = f"repair {reply.kept}" if reply.kept else "the drawing (no repair was judged a match)"
        out.append({"role": "assistant", "content": f"Kept: {kept}."})
    return out
