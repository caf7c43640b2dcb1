"""Shared fixtures.

pytest-tornasync's own ``io_loop`` fixture calls the deprecated ``make_current``;
ours builds a fresh loop without it, so the suite runs with warnings as errors.
"""
import pytest
import tornado.ioloop


@pytest.fixture
def io_loop():
    loop = tornado.ioloop.IOLoop(make_current=False)
    yield loop
    loop.close(all_fds=True)
