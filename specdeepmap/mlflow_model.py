"""MLflow pyfunc wrapper of a specdeepmap model, logged as code (no pickled objects).

``mlflow.pyfunc.load_model("models:/NAME@ALIAS")`` gives a model whose ``predict`` takes raw
pixel arrays (N, bands, rows, cols) and returns class values (N, rows, cols). The weights are
read from the ``model_file`` artifact with ``weights_only=True``.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class SpecDeepMapModel(PythonModel):
    """Predict class values of raw pixel arrays."""

    def load_context(self, context):
        """Load the model file artifact."""
        from specdeepmap.inference import load_model

        self.predictor = load_model(context.artifacts["model_file"], device="auto")

    def predict(self, context, model_input, params=None):
        """Class values for a (N, bands, rows, cols) array of raw pixel values."""
        return self.predictor.predict_classes(np.asarray(model_input, dtype=np.float32))


mlflow.models.set_model(SpecDeepMapModel())
