-- Schema version 13: each catalog row's CPU architecture ('x86_64' or 'arm64', from the cloud's own
-- API), so a launch boots an image built for it. Rows cached before this are '' (unknown) until the
-- next `cloudtaskctl catalog refresh`; a launch of an unknown type assumes x86_64 and logs it.
ALTER TABLE catalog ADD COLUMN arch TEXT NOT NULL DEFAULT '';
