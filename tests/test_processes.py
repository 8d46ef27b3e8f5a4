"""Worker processes (fsqtok/data/processes.py): results in order, errors raised in the caller."""
import operator
import os
import pickle

import pytest

from fsqtok.data import processes


def _not_importable_by_a_worker(shared):
  return shared


def test_results_come_back_in_order_whatever_the_number_of_workers():
  chunks = [(i,) for i in range(7)]
  for workers in (1, 2, 3, 10):
    assert processes.map_chunks(operator.mul, chunks, workers, shared=3) == [
        3 * i for i in range(7)]
  assert processes.map_chunks(operator.mul, [], 2, shared=3) == []


def test_worker_errors_are_raised_in_the_caller():
  with pytest.raises(ZeroDivisionError):  # the worker's own exception
    processes.map_chunks(operator.truediv, [(2,), (0,)], 2, shared=1)
  with pytest.raises(RuntimeError, match="(?s)worker process failed.*No module named"):
    processes.map_chunks(_not_importable_by_a_worker, [()], 1)  # tests/ is not on its path
  with pytest.raises((AttributeError, pickle.PicklingError)):  # never reaches a worker
    processes.map_chunks(lambda shared: shared, [()], 1)


def test_workers_are_given_the_directory_that_holds_the_package():
  # what a worker of a checkout that is not installed needs on its PYTHONPATH
  root = processes._PACKAGE_ROOT  # pylint: disable=protected-access
  assert os.path.isfile(os.path.join(root, "fsqtok", "data", "processes.py"))
