"""A tiny module with one bug, for an agent to fix."""


def add(a, b):
    return a - b


def multiply(a, b):
    return a * b
