"""The Django app of the ``django`` and ``django-pgwarden`` stress clients (its models are
in :mod:`.models`); installed by :mod:`pgwarden.stress.django_clients` in the worker."""

from __future__ import annotations

from django.apps import AppConfig


class StressConfig(AppConfig):  # type: ignore[misc]
    name = "pgwarden.stress.django_app"
    label = "pgwarden_stress"
    default_auto_field = "django.db.models.BigAutoField"
