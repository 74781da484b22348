// A scripted session through the gateway with the PostgreSQL JDBC driver (pgjdbc): TLS verified
// against the gateway's CA, SCRAM-SHA-256, server-side prepared statements, a batch, a transaction.
// Run as a single source file: java -cp postgresql.jar Session.java URL USER PASSWORD
// Prints one line per step, "key=value".
import java.sql.*;

public class Session {
    public static void main(String[] args) throws Exception {
        try (Connection c = DriverManager.getConnection(args[0], args[1], args[2])) {
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("select count(*) from customers")) {
                r.next();
                System.out.println("count=" + r.getInt(1));
            }
            // pgjdbc switches to a named server-side statement from the fifth execution on
            try (PreparedStatement p = c.prepareStatement("select id, email, card_number from customers where id = ?")) {
                StringBuilder seen = new StringBuilder();
                for (int i = 1; i <= 7; i++) {
                    p.setInt(1, i);
                    try (ResultSet r = p.executeQuery()) {
                        r.next();
                        seen.append(r.getInt(1)).append('|').append(r.getString(2)).append('|').append(r.getString(3)).append(';');
                    }
                }
                System.out.println("prepared=" + seen);
            }
            System.out.println("denied=" + refused(c, "delete from orders"));
            System.out.println("derived=" + refused(c, "select upper(card_number) from customers where id = 1"));
            System.out.println("error=" + refused(c, "select 1/0"));
            c.setAutoCommit(false);
            try (PreparedStatement p = c.prepareStatement("update orders set total_cents = total_cents where id = ?")) {
                for (int i = 1; i <= 3; i++) { p.setInt(1, i); p.addBatch(); }
                int total = 0;
                for (int n : p.executeBatch()) total += n;
                System.out.println("batch=" + total);
            }
            c.rollback();
            c.setAutoCommit(true);
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("select 1")) {
                r.next();
                System.out.println("after=" + r.getInt(1));
            }
        }
    }

    static String refused(Connection c, String sql) {
        try (Statement s = c.createStatement()) {
            s.execute(sql);
            return "none";
        } catch (SQLException e) {
            return e.getSQLState() + " " + e.getMessage().replace('\n', ' ');
        }
    }
}
