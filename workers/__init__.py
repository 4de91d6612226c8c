"""The arq side of the drain orchestrator: worker settings, job functions and the Redis semaphore."""
