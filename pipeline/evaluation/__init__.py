"""Evaluation: long-tail metrics (`metrics`), scoring a model on a split (`scoring`), text
reports and plots (`reports`, `plots`), evaluating a registered model (`evaluate`) and the
promotion rule (`promotion`). `metrics`, `scoring`, `reports` and `plots` import neither Ray nor
MLflow; `evaluate` and `promotion` reach the registry through `pipeline.tracking`."""
