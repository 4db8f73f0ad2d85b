"""imagepipe stages: one module per DVC stage, each a typed run() core and a thin main().

Importing a stage changes nothing in the process; process settings are made by the stage door
(stages/core/door.py) when a stage runs.
"""
