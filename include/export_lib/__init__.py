"""export_lib: the export engine (convert, calibrate, validate, benchmark, select, storage).

Plain Python, no Airflow. Runs as `python -m export_lib <step>` in GPU pods and as a local process.
This package root stays light (no torch/onnx imports) so the Airflow side can use config and storage.
"""

__version__ = "0.1.0"
