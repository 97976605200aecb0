"""Model definitions: typed configs (OpenCLIP's JSON shape, ``configs/``), the towers and their layers, and
the dual encoder ``CLIP`` that holds them."""
