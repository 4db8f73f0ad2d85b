"""What a registered model's server runs: the pyfunc wrapper (pyfunc.py) and the pixel contract
it checks requests against (pixels.py). The model ships these with only the modules they import
(pyfunc.SHIPPED), not the rest of stages/."""
