"""The runtime: compiles a pipeline's stages into workers and runs them on a transport."""
