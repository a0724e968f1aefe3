"""The job's child process (pure torch and files) and the protocol it speaks to the GPU worker."""
