"""imagepipe stages: one module per DVC stage, each a typed run() core and a thin main()."""

import os

# Every stage imports torch, whose OpenMP runtime reads this once when it loads, so it is set
# here, before any stage module runs. OpenMP threads spin while they wait by default: on a CPU
# that other processes share, two spinning threads ran a resnet_small step 12-25x slower than
# passive ones (235-460 ms vs 19-40 ms, measured). A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
