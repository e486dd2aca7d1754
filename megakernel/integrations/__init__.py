"""Adapters from other libraries' MoE modules to ``FusedEPMoE`` (``hf``: Hugging Face
``transformers``)."""
