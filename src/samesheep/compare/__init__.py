"""Two models' SAEs on aligned units: sparse correlation, matching, measurements with their
floors, ceilings, nulls and intervals, the answer, and the compare stage."""
