"""Command-line subcommands of the language-model stage."""

# The weight quantisation schemes of lm/quantize.py (SCHEMES there is this tuple), named here without
# importing torch so that the command line parses fast.
QUANTIZATION_SCHEMES = ("int8", "int8-dynamic", "int4")
