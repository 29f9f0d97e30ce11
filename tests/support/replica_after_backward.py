"""A recipe plugin for tests/test_replicas.py (`plugins: [this file]`): the replicas all-reduce
every gradient bucket after the backward, right before the step, instead of launching buckets
from gradient hooks during it (frzoo.executors.replicas.OVERLAP). The sums are the same, bit
for bit: the tests compare the two paths."""
from frzoo.executors import replicas

replicas.OVERLAP = False
