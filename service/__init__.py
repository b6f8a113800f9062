"""Service stage: command line, gRPC services and batch jobs."""
