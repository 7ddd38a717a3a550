"""Example agents. Installed as ``rollouttap.examples`` so that the demo finds its agent outside a checkout:
``python -m rollouttap.examples.openai_agent "What is 17 * 23?"``."""
