"""Bundle-local Python for brainsynth (TC-MGAN): only the pieces MONAI does not provide."""
