#!/bin/sh
# The "product" of the example: prints a greeting.
echo "hello, ${1:-world}"
