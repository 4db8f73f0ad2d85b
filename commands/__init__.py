"""The `imagepipe` command line: run, predict, promote, rollback, lineage (commands/cli.py routes).

Commands are not DVC stages: they operate on what the stages made (the registry, ONNX files)
and on the pipeline as a whole. They may import stages and flows; stages import neither.
"""
