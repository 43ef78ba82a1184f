"""Files in and out: model directories and safetensors (model_io), model references as directories or Hub ids
(refs), what a run may write and how (rundir), YAML and JSON (jsonio)."""
