# Marks relay/core as a Cython package: the compiled core's declarations
# (.pxd) and the per-packet code it includes (.pxi). No Python lives here.
