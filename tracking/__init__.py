"""MLflow: registering evaluated variants (registry), the servable pyfunc model (serving), and
observation runs (observation). flows -> tracking -> ffsplit; the core library never imports it.
"""
