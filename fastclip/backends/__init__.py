"""Where ops run: the op table and backend resolution (dispatch), the C++ CPU ops (``cpu/``, one module per
op), int8 linear layers (int8), packed-weight caches (weight_packs) and ``fastclip verify`` (verify). The
reference ops are ``fastclip.ref``; the Triton ops are ``fastclip.kernels``."""
