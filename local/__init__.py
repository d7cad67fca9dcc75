"""Running the upgrade without a cluster: throwaway servers, a write workload,
the workflow's task graph executed locally, and the rehearsal report."""
