#!/bin/sh
# Unit tests of the example, written as a JUnit XML report.
set -u
mkdir -p reports
out=$(sh ./hello.sh slipway)
status=0
{
  echo '<?xml version="1.0" encoding="UTF-8"?>'
  echo '<testsuite name="unit" tests="2">'
  echo '  <testcase classname="hello" name="greets_by_name" time="0.001"/>'
  if [ "$out" = "hello, slipway" ]; then
    echo '  <testcase classname="hello" name="prints_greeting" time="0.001"/>'
  else
    echo '  <testcase classname="hello" name="prints_greeting" time="0.001"><failure message="unexpected output">'"$out"'</failure></testcase>'
    status=1
  fi
  echo '</testsuite>'
} > reports/unit.xml
exit $status
