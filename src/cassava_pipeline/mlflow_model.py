"""MLflow "model from code": the pyfunc logged by ``MlflowPyfuncModelDataset``.

MLflow runs this file when it loads the model, instead of unpickling a Python object; the
weights come from the model's ``model`` artifact (the safetensors file with its model card).
"""

import mlflow

from cassava_pipeline.tracking import CassavaPyfunc

mlflow.models.set_model(CassavaPyfunc())
