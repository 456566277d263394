"""``omnigen2 eval omnicontext``: the OmniContext benchmark (in-context generation scored for prompt following and
subject consistency by a vision-language judge), end to end (docs/EVAL.md).

``data`` loads the published dataset (hub, parquet files or a ``data.jsonl`` folder), ``run`` generates through
``omnigen2 batch`` and drives the judge, ``judge`` talks to any OpenAI-compatible vision chat endpoint with a
reply cache, ``score`` turns judged samples into the report. Nothing here imports torch until generation runs.
"""

TASK_TYPES = (
    "single_character",
    "single_object",
    "multi_character",
    "multi_object",
    "multi_character_object",
    "scene_character",
    "scene_object",
    "scene_character_object",
)
HUB_ID = "OmniGen2/OmniContext"
