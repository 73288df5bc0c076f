"""Framework adapters: thin translations of a framework's hooks into :class:`gradguard.Guard` calls.

* :mod:`gradguard.integrations.lightning` — ``GradGuardCallback`` for ``lightning.pytorch``
  (``pip install "gradguard[lightning]"``).
* :mod:`gradguard.integrations.transformers` — ``GradGuardCallback`` for the Hugging Face
  ``transformers.Trainer`` (``pip install "gradguard[transformers]"``).

Nothing is imported here: ``import gradguard`` (or ``gradguard.integrations``) never imports
lightning or transformers; import the submodule you use.
"""

__all__: list[str] = []
