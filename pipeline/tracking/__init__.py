"""Everything MLflow: one run per run name and what it logs (`runs`: `RunLogger`, one value per
step), the tracking store and its server checks (`store`), the splits as dataset inputs
(`lineage`), model registration and lookup (`registry`, `versions`), and the guard process that
ends a killed driver's run (`driver_guard`). The only package that imports MLflow."""
