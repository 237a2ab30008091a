-- Fragment field_map: reads a flat field/value reply (XINFO GROUPS or CONSUMERS entries, HGETALL).
-- expects: nothing
-- defines: local function field_map(flat): {f1, v1, f2, v2, ...} as the table {[f1] = v1, ...}
--          (values as the server sent them: numbers stay numbers, text stays text)
local function field_map(flat)
  local map = {}
  for i = 1, #flat, 2 do
    map[flat[i]] = flat[i + 1]
  end
  return map
end
