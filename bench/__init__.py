"""The benchmark suite of compeft_format: ``python -m bench [--quick] [--out DIR]``.

See bench/README.md for what each section measures.
"""
