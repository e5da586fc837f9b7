"""What is measured: slices along directions (:mod:`.directions`, :mod:`.slices`), the Hessian's spectrum and trace
(:mod:`.hessian`, with :mod:`.batchsize`, :mod:`.validity` and the PyHessian reference :mod:`.reference`),
sharpness (:mod:`.sharpness`), gradient coherence (:mod:`.coherence`), connectivity and comparison of solutions
(:mod:`.connectivity`, :mod:`.matching`, :mod:`.compare`), trajectories and the training monitor
(:mod:`.trajectory`, :mod:`.monitor`, :mod:`.callbacks`), the cost model of the dry run (:mod:`.costs`), and the
scan that runs them into one run file (:mod:`.scan`). Each analysis takes a Problem and writes a frozen result to
the run file; none imports :mod:`landscape.report`."""
