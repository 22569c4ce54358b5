"""Sample model factories used by the demo, the tests and the benchmarks.

Referenced from the export config as `model_zoo.digits:DigitsCNN` and `model_zoo.encoder:TinyEncoder`.
"""
