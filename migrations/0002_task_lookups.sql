-- Indexes for the common task queries: by assignee and by status within a project.
CREATE INDEX tasks_assignee_id_idx ON tasks (assignee_id) WHERE assignee_id IS NOT NULL;
CREATE INDEX tasks_project_status_idx ON tasks (project_id, status);
