"""The build contract: what a longdata build directory holds and how to read it safely."""
