"""The transfer evaluations, one module each: (pretrained backbone, data, config) -> metrics.

Each fine-tunes the whole pretrained network on its task, as the study did.
"""
