"""Distributed training: process groups, data/model parallel wrappers, context parallelism."""
