namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// Writes a log line that changes nothing when it cannot be written (its disk full, say): a line about a request, a
/// renewal or a write is never worth failing it, nor a timer's callback, whose throw would end the process.
/// </summary>
internal static class LogLines
{
    public static void TryWrite<TState>(ILogger logger, TState state, Action<ILogger, TState> write)
    {
        try
        {
            write(logger, state);
        }
        catch (Exception)
        {
            // Unlogged.
        }
    }
}
