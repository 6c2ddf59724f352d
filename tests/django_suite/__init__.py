"""Django under pgwarden in tests: settings for Django's own suite (``pgwarden_settings``,
``pgwarden_runner``, run by ``runtests.py``) and an in-process Django for pgwarden's own
tests (``inprocess``, with the models of ``faultapp``)."""
