"""The test suite, by concern: ``training/``, ``export/``, ``service/``, ``browser/``.

A package (with one in each folder) so that pytest imports the test modules under unique names
(``tests.service.test_api``, ``tests.training.test_runs``...) and never as a bare ``service`` or
``training`` that would shadow the project's own packages.
"""
