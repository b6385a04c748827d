-- lib/clock.lua: Redis's clock, never a client's, and exact numbers.

-- Milliseconds and whole seconds on Redis's clock.
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), tonumber(t[1])
end

-- Lua would print large numbers with 14 significant digits; scores must be
-- exact. A string (an integer already printed, or an argument as it came)
-- is kept as it is: printing and parsing numbers is a good part of what a
-- script costs Redis, so scripts print each number once. A whole number
-- (every score and time in ms is one, below 2^53) is printed as an integer:
-- `%d` takes glibc's integer path, 1.7k instructions for a time in ms and
-- 6.9k for a score near 2^53, against 3.9k and 9.9k for `%.0f`'s
-- floating-point one (callgrind); anything else is rounded as before.
local function int(x)
  if type(x) == 'string' then
    return x
  elseif x % 1 == 0 then
    return string.format('%d', x)
  end
  return string.format('%.0f', x)
end
