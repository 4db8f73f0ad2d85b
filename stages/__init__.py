"""imagepipe stages: one module per DVC stage, each a typed run() core and a thin main()."""
