"""rgfusion's cluster tools: multi-node job submission, Ray Tune sweeps, MLflow run comparison.

``slurm`` (sbatch + srun + torchrun), ``deepspeed_launch`` (hostfile launcher) and ``ray_jobs``
(Jobs API + Ray Train) submit training; ``sweep`` runs Ray Tune with ASHA and nested MLflow
runs; ``compare`` ranks runs. The trainer is reached only through ``rgfusion.trainer.train`` or
its ``rgfusion train`` command line; ``cli.register`` adds the commands.
"""
