"""``omnigen2 batch RECORDS.jsonl -o OUT/``: generate one image per JSON Lines record, on one process, on every
process of an ``accelerate launch`` job, or on a Ray Data pipeline (docs/BATCH.md).

``records`` parses and checks the records (no torch), ``runner`` generates and writes the manifest,
``ray_engine`` runs the same records through Ray Data, ``cli`` declares the subcommand.
"""
