-- answers: The stored attribution graphs with their target, sizes, scores (replacement,
-- completeness, pruned scores, faithfulness) and conservation / reproduction errors.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- columns: graph_id, run_id, prompt_id, step, sigma, target_spec, target_rank, target_key, target_kind, target_layer, target_stream, target_feature, target_position, target_value, bias_total, status, reason, n_nodes_unpruned, n_edges_unpruned, n_nodes, n_edges, conservation_error, conservation_error_max, reproduction_error, replacement_score, completeness_score, pruned_replacement_score, pruned_completeness_score, kept_node_influence, kept_edge_influence, faithfulness_k, faithfulness_spearman, faithfulness_pearson, node_threshold, edge_threshold, max_feature_nodes, dtype, time_total_s, created_at
SELECT graph_id, run_id, prompt_id, step, sigma, target_spec, target_rank, target_key, target_kind, target_layer,
       target_stream, target_feature, target_position, target_value, bias_total, status, reason, n_nodes_unpruned,
       n_edges_unpruned, n_nodes, n_edges, conservation_error, conservation_error_max, reproduction_error,
       replacement_score, completeness_score, pruned_replacement_score, pruned_completeness_score,
       kept_node_influence, kept_edge_influence, faithfulness_k, faithfulness_spearman, faithfulness_pearson,
       node_threshold, edge_threshold, max_feature_nodes, dtype, time_total_s, created_at
FROM graphs
WHERE getvariable('run_id') IS NULL OR run_id = getvariable('run_id')
ORDER BY run_id, prompt_id, step, target_spec, target_rank, graph_id
