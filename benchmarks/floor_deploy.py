"""pyinfra's own floor for a no-op rerun: a 3-operation deploy (a package, a folder, a file), the
yardstick of the full deploy's no-op rerun (benchmarks/converge_bench.py --floor)."""

from io import StringIO

from pyinfra.operations import apt, files

apt.packages(name="Package python3", packages=["python3"])
files.directory(name="Directory /var/tmp/llmhost-floor", path="/var/tmp/llmhost-floor",
                user="root", group="root", mode="755")
files.put(name="File /var/tmp/llmhost-floor/file", src=StringIO("floor\n"),
          dest="/var/tmp/llmhost-floor/file", user="root", group="root", mode="644")
